/**
 * The largest JSON body that a valid request can need: a prompt's 200 + 100,000 characters, each a JSON
 * escape of up to 12 bytes (an emoji written `\ud83d\ude00`, as Python's json.dumps writes it by
 * default), with room for the rest. At 1 MiB, such valid prompts and chat messages were refused (413).
 * Only the routes of prompts and chat take one (their `bodyLimit`).
 */
export const BODY_LIMIT_BYTES = 1.25 * 1024 * 1024;

/**
 * The body every other route takes at most: its fields (an email, a password, a name, a description of
 * 2,000 characters) in 6 bytes a character escaped, with room to spare. A body is held in memory as it
 * arrives, until its last byte or REQUEST_TIMEOUT_MS: with 1.25 MiB on every route, a client trickling
 * bodies to the login and registration routes, which it needs no account for, held a gigabyte with
 * 1,200 connections for five minutes.
 */
export const SMALL_BODY_LIMIT_BYTES = 32 * 1024;

/** What an upload's form may hold around its file: the boundaries and a part's headers (a name of 255 characters, in UTF-8). */
export const FORM_FRAMING_BYTES = 64 * 1024;
