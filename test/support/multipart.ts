/** One part of a multipart/form-data body, written out as given (no escaping: tests send hostile names too). */
export interface FormPart {
  /** The form field; `file` by default. */
  name?: string;
  /** The `filename` parameter, quoted as is; absent for a plain field. */
  filename?: string;
  /** More Content-Disposition parameters, e.g. `filename*=UTF-8''%E2%82%AC.txt`. */
  parameters?: string;
  /** The part's Content-Type; none when absent. */
  type?: string;
  content: string | Uint8Array;
}

export const BOUNDARY = 'test-boundary-c0ffee';

/** The head of one part: boundary line and headers, up to the blank line before its content. */
export function partHead(part: Omit<FormPart, 'content'>): Buffer {
  const disposition = [`form-data; name="${part.name ?? 'file'}"`];
  if (part.filename !== undefined) disposition.push(`filename="${part.filename}"`);
  if (part.parameters) disposition.push(part.parameters);
  const headers = [`Content-Disposition: ${disposition.join('; ')}`, ...(part.type ? [`Content-Type: ${part.type}`] : [])];
  return Buffer.from(`--${BOUNDARY}\r\n${headers.join('\r\n')}\r\n\r\n`);
}

export const CLOSING = Buffer.from(`--${BOUNDARY}--\r\n`);

/** A whole multipart/form-data request: its payload and its Content-Type header. */
export function multipart(...parts: FormPart[]): { payload: Buffer; headers: { 'content-type': string } } {
  const chunks = parts.flatMap((part) => [partHead(part), Buffer.from(part.content), Buffer.from('\r\n')]);
  return { payload: Buffer.concat([...chunks, CLOSING]), headers: { 'content-type': `multipart/form-data; boundary=${BOUNDARY}` } };
}
