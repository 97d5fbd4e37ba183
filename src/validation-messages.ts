import { z } from 'zod';

/** What a value of each type zod names is called in a message. */
const TYPE_NAMES: Record<string, string> = {
  string: 'a string',
  number: 'a number',
  int: 'a whole number',
  boolean: 'true or false',
  object: 'an object',
  array: 'an array',
  date: 'a date',
};

/** What the formats zod checks are called in a message. */
const FORMAT_NAMES: Record<string, string> = {
  uuid: 'a UUID',
  guid: 'a UUID',
  email: 'an email address',
  url: 'a URL',
  datetime: 'a date and time in ISO 8601 form (2025-06-01T12:00:00Z)',
};

const plural = (count: number | bigint, one: string, many: string) => `${count} ${count === 1 || count === 1n ? one : many}`;

/**
 * One voice for why a value is refused, in a field error's `message` and in the configuration's one
 * line: `must be at most 200 characters`, `is required`. zod's own words ("Too small: expected string to
 * have >=1 characters", "Invalid input: expected string, received undefined") sat beside the service's
 * ("must not be blank") in one response. A schema's own message still wins; an issue not named here
 * keeps zod's.
 */
export function validationMessage(issue: z.core.$ZodRawIssue): string | undefined {
  // A property left out fails its type, or its list of values.
  if (issue.input === undefined && (issue.code === 'invalid_type' || issue.code === 'invalid_value')) return 'is required';
  switch (issue.code) {
    case 'invalid_type':
      return TYPE_NAMES[issue.expected] && `must be ${TYPE_NAMES[issue.expected]}`;
    case 'too_small':
      if (issue.origin === 'string') return issue.minimum === 1 ? 'must not be empty' : `must be at least ${plural(issue.minimum, 'character', 'characters')}`;
      if (issue.origin === 'array') return `must hold at least ${plural(issue.minimum, 'item', 'items')}`;
      return `must be ${issue.inclusive === false ? 'more than' : 'at least'} ${issue.minimum}`;
    case 'too_big':
      if (issue.origin === 'string') return `must be at most ${plural(issue.maximum, 'character', 'characters')}`;
      if (issue.origin === 'array') return `must hold at most ${plural(issue.maximum, 'item', 'items')}`;
      return `must be ${issue.inclusive === false ? 'less than' : 'at most'} ${issue.maximum}`;
    case 'invalid_value':
      return `must be ${issue.values.length === 1 ? '' : 'one of '}${issue.values.map((value) => JSON.stringify(value)).join(', ')}`;
    case 'invalid_format':
      return FORMAT_NAMES[issue.format] && `must be ${FORMAT_NAMES[issue.format]}`;
    case 'unrecognized_keys':
      return `takes no ${issue.keys.length === 1 ? 'property' : 'properties'} ${issue.keys.map((key) => JSON.stringify(key)).join(', ')}`;
    default:
      return undefined;
  }
}

z.config({ customError: validationMessage });
