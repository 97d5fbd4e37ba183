const MAX_FILENAME_CHARS = 255;
/** The longest ending after a name's last dot kept as its extension when the name is cut. */
const MAX_EXTENSION_CHARS = 16;
const FALLBACK_FILENAME = 'file';
const graphemes = new Intl.Segmenter(undefined, { granularity: 'grapheme' });

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
  return withinLimit(name) || FALLBACK_FILENAME;
}

/**
 * A name of more than MAX_FILENAME_CHARS code points cut to that many, its extension kept (a download
 * saved without it opens with nothing), between two characters as a reader sees them: an emoji of
 * several code points (a family, a flag) is kept whole or left out.
 */
function withinLimit(name: string): string {
  if (codePoints(name) <= MAX_FILENAME_CHARS) return name;
  const dot = name.lastIndexOf('.');
  const extension = dot > 0 && codePoints(name.slice(dot + 1)) <= MAX_EXTENSION_CHARS ? name.slice(dot) : '';
  let stem = '';
  let room = MAX_FILENAME_CHARS - codePoints(extension);
  for (const { segment } of graphemes.segment(extension ? name.slice(0, dot) : name)) {
    room -= codePoints(segment);
    if (room < 0) break;
    stem += segment;
  }
  // A first character longer than the room (a letter under hundreds of combining marks) leaves no stem.
  return (stem.trimEnd() || FALLBACK_FILENAME) + extension;
}

const codePoints = (text: string): number => {
  let count = 0;
  for (const _ of text) count++;
  return count;
};

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
