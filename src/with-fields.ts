/**
 * A copy of `base` with `fields` added: `{ ...base, ...fields }`, built so that V8 can reuse its hidden
 * class. On Node 20 (V8 11.3) an object made by a leading spread that then takes a key its source did not
 * have gets a hidden class of its own, every time: about 1.2 µs and 100 bytes of old generation per
 * object, where `Object.assign` onto a new object takes 0.1 µs and nothing (`{ ...base, key }` with
 * `key` already in `base` is as cheap). Used where such a copy is made for every request.
 */
export function withFields<Base extends object, Fields extends object>(base: Base, fields: Fields): Omit<Base, keyof Fields> & Fields {
  return Object.assign({}, base, fields);
}
