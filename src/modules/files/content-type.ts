/*
 * The media type stored for an upload: the one the client declared, checked against the bytes where
 * that is cheap (a few leading bytes and one streaming UTF-8 check):
 *  1. Bytes that start with a known signature (PNG, JPEG, GIF, PDF, ZIP, gzip) are of that type,
 *     whatever was declared; ZIP bytes keep a declared type of another kind (DOCX, XLSX, EPUB and JAR
 *     are ZIP files).
 *  2. A declared text type (text/*, JSON) is kept only for UTF-8 bytes without NUL; others become
 *     application/octet-stream.
 *  3. application/octet-stream, what clients send when they do not know, becomes text/plain for
 *     UTF-8 text.
 *  4. A declared signature type whose signature is missing becomes application/octet-stream.
 *  5. Anything else is kept as declared.
 * Nothing is refused for its type: the check only keeps a mislabelled file from being treated as text
 * (in chat) or as a PDF (sent to the provider), and downloads carry `nosniff` either way.
 */

export const OCTET_STREAM = 'application/octet-stream';
const ZIP = 'application/zip';

const SIGNATURES: { type: string; magic: Buffer[] }[] = [
  { type: 'image/png', magic: [Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])] },
  { type: 'image/jpeg', magic: [Buffer.from([0xff, 0xd8, 0xff])] },
  { type: 'image/gif', magic: [Buffer.from('GIF87a'), Buffer.from('GIF89a')] },
  { type: 'application/pdf', magic: [Buffer.from('%PDF-')] },
  { type: ZIP, magic: [Buffer.from('PK\x03\x04'), Buffer.from('PK\x05\x06')] },
  { type: 'application/gzip', magic: [Buffer.from([0x1f, 0x8b])] },
];
const SIGNED_TYPES = new Set(SIGNATURES.map((signature) => signature.type));
const HEAD_BYTES = Math.max(...SIGNATURES.flatMap((signature) => signature.magic.map((magic) => magic.length)));

/** Text a model can read as it is: text/* (Markdown, CSV, plain…) and JSON. */
export function isTextType(mimeType: string): boolean {
  return mimeType.startsWith('text/') || mimeType === 'application/json' || mimeType.endsWith('+json');
}

/**
 * `Text/Plain; charset=utf-8` → `text/plain`; anything that is not a type/subtype → application/octet-stream.
 * Names are at most 127 characters each (RFC 6838): the type is stored, listed and sent as a download's
 * header, and a part's headers may otherwise carry tens of kilobytes of it.
 */
export function essence(declared: string | undefined): string {
  const type = (declared ?? '').split(';')[0]!.trim().toLowerCase();
  return /^[\w.+-]{1,127}\/[\w.+-]{1,127}$/.test(type) ? type : OCTET_STREAM;
}

/** Looks at an upload's bytes as they stream past, then says which type to store (see above). */
export class ContentInspector {
  private head = Buffer.alloc(0);
  private readonly decoder = new TextDecoder('utf-8', { fatal: true });
  private utf8Text = true;

  inspect(chunk: Uint8Array): void {
    if (this.head.length < HEAD_BYTES) {
      this.head = Buffer.concat([this.head, chunk.subarray(0, HEAD_BYTES - this.head.length)]);
    }
    if (this.utf8Text) this.utf8Text = !chunk.includes(0) && this.decodes(chunk);
  }

  mimeType(declared: string): string {
    // A character cut off by the end of the file is not UTF-8 either.
    const utf8Text = this.utf8Text && this.decodes(new Uint8Array(), true);
    const signed = SIGNATURES.find((signature) => signature.magic.some((magic) => this.head.subarray(0, magic.length).equals(magic)))?.type;
    if (signed === ZIP && declared !== OCTET_STREAM && !isTextType(declared) && !SIGNED_TYPES.has(declared)) return declared;
    if (signed) return signed;
    if (isTextType(declared)) return utf8Text ? declared : OCTET_STREAM;
    if (declared === OCTET_STREAM) return utf8Text ? 'text/plain' : OCTET_STREAM;
    return SIGNED_TYPES.has(declared) ? OCTET_STREAM : declared;
  }

  private decodes(chunk: Uint8Array, last = false): boolean {
    try {
      this.decoder.decode(chunk, { stream: !last });
      return true;
    } catch {
      return false;
    }
  }
}
