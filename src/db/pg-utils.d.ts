// pg's utilities module, which pg's own types leave out: how pg turns a statement's value into what it sends.
declare module 'pg/lib/utils.js' {
  const utils: { prepareValue(value: unknown): unknown };
  export default utils;
}
