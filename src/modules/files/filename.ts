const MAX_FILENAME_CHARS = 255;
const FALLBACK_FILENAME = 'file';

/**
 * The name an upload is shown and downloaded under; it never becomes part of a path (files are
 * stored by id). Folders a client sent along are dropped, and so are control characters and the
 * bidirectional overrides that can make `exe.txt` display as `txt.exe`.
 */
export function displayFilename(uploaded: string | undefined): string {
  const name = (uploaded ?? '')
    .split(/[/\\]/)
    .at(-1)!
    // Lone surrogates would make the name unencodable in a header.
    .replace(/\p{Surrogate}/gu, '\uFFFD')
    .replace(/[\p{Cc}\u202A-\u202E\u2066-\u2069]/gu, '')
    .trim();
  return [...name].slice(0, MAX_FILENAME_CHARS).join('') || FALLBACK_FILENAME;
}

/**
 * `Content-Disposition: attachment` for `filename` (RFC 6266): the exact name as RFC 8187
 * `filename*=UTF-8''…`, and a plain `filename="…"` for clients that know no better, in which anything
 * but letters, digits, spaces and `._-()` becomes `_`: nothing from the name can end the header,
 * leave its quotes, or look like another parameter to a careless parser.
 */
export function attachmentDisposition(filename: string): string {
  const ascii = filename.replace(/[^\w .()-]/g, '_');
  const encoded = encodeURIComponent(filename).replace(/['()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encoded}`;
}
