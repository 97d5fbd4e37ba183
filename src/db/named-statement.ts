import pgUtils from 'pg/lib/utils.js';

type Parser = (text: string) => unknown;

export interface TypeParsers {
  getTypeParser(typeId: number, format?: string): Parser;
}

/** The part of pg's connection (internal to pg's types) that an execution writes to. */
interface Connection {
  parsedStatements: Record<string, string | undefined>;
  submittedNamedStatements: Record<string, string | undefined>;
  stream: { cork?(): void; uncork?(): void };
  parse(message: { name: string; text: string }): void;
  bind(message: { statement: string; values: unknown[]; valueMapper: (value: unknown) => unknown }): void;
  describe(message: { type: 'P'; name: string }): void;
  execute(message: { portal: string }): void;
  sync(): void;
  sendCopyFail(message: string): void;
}

type Answer = (error: Error | null, result?: { rows: unknown[][] }) => void;

/** A pg client or pool: what takes a query object, with a callback for its answer. */
interface Queryable {
  query(execution: Execution, values: undefined, callback: Answer): unknown;
}

/**
 * A named statement executed on `pg` with its result described once per connection, rather than at each
 * execution as pg's own query does. pg asks PostgreSQL to describe the result every time, parses that
 * description, finds a parser for each column again, builds an empty row object that rows as arrays never
 * use, and first copies the query's config property by property. Without that, a request of
 * `GET /api/v1/projects/:id` (one statement) took 29% fewer instructions (docs/benchmarks.md). On one
 * connection a named statement's result keeps its columns and types: PostgreSQL fails an execution whose
 * plan would change them ("cached plan must not change result type"). A connection that parses the
 * statement anew (a new connection) describes it anew. One deallocated and prepared again under its name
 * by SQL sent on the connection (which pg would not know of either) is not.
 *
 * Rows come as arrays, each column through `types`' parser, as pg's `rowMode: 'array'` gives them.
 */
export class NamedStatement {
  /** Each column's parser, by the connection the statement was described on. */
  readonly described = new WeakMap<Connection, Parser[]>();

  constructor(
    readonly name: string,
    readonly text: string,
    readonly types: TypeParsers,
  ) {}

  /**
   * The statement executed once with `values` on `client` (a pg client or pool): its rows. The callback
   * is given here: pg's client returns a query object itself, not a promise, and gives it no callback
   * of its own.
   */
  run(client: Queryable, values: unknown[]): Promise<unknown[][]> {
    return new Promise((resolve, reject) => {
      client.query(new Execution(this, values), undefined, (error, result) => (error ? reject(error) : resolve(result!.rows)));
    });
  }
}

/**
 * One execution: the query object pg takes in place of a config (it calls `submit`, then a `handle…`
 * for each message PostgreSQL answers with), answered once through `callback`, which pg sets.
 */
export class Execution {
  readonly name: string;
  readonly text: string;
  callback: Answer | undefined;
  private connection: Connection | undefined;
  private parsers: Parser[] | undefined;
  private readonly rows: unknown[][] = [];
  /** A failure before the statement's end (its values, a column's parser): told when it ends. */
  private failure: Error | undefined;

  constructor(
    private readonly statement: NamedStatement,
    private readonly values: unknown[],
  ) {
    this.name = statement.name;
    this.text = statement.text;
  }

  submit(connection: Connection): Error | null {
    const { name, text, described } = this.statement;
    const parsed = connection.parsedStatements[name] ?? connection.submittedNamedStatements[name];
    // pg's own refusal, in its words.
    if (parsed !== undefined && parsed !== text) return new Error(`Prepared statements must be unique - '${name}' was used for a different statement`);
    this.connection = connection;
    this.parsers = parsed === undefined ? undefined : described.get(connection);
    // The messages leave in one write.
    connection.stream.cork?.();
    try {
      if (parsed === undefined) {
        connection.parse({ name, text });
        connection.submittedNamedStatements[name] = text;
      }
      try {
        connection.bind({ statement: name, values: this.values, valueMapper: pgUtils.prepareValue });
      } catch (error) {
        // A value pg cannot send (its `toPostgres` threw): nothing of the bind was written. The statement,
        // if parsed here, stays prepared for the next execution (pg's own query closes it, though it
        // still counts it as parsed).
        this.failure = error as Error;
        connection.sync();
        return null;
      }
      if (!this.parsers) connection.describe({ type: 'P', name: '' });
      connection.execute({ portal: '' });
      connection.sync();
    } finally {
      connection.stream.uncork?.();
    }
    return null;
  }

  handleRowDescription(message: { fields: { dataTypeID: number; format: string }[] }): void {
    const { types, described } = this.statement;
    this.parsers = message.fields.map((field) => types.getTypeParser(field.dataTypeID, field.format));
    described.set(this.connection!, this.parsers);
  }

  handleDataRow(message: { fields: (string | null)[] }): void {
    if (this.failure) return;
    const { fields } = message;
    const row = new Array<unknown>(fields.length);
    try {
      for (let i = 0; i < fields.length; i++) {
        const text = fields[i]!;
        row[i] = text === null ? null : this.parsers![i]!(text);
      }
    } catch (error) {
      this.failure = error as Error;
      return;
    }
    this.rows.push(row);
  }

  handleReadyForQuery(): void {
    if (this.failure) this.answer(this.failure);
    else this.answer(null, { rows: this.rows });
  }

  handleError(error: Error): void {
    this.answer(this.failure ?? error);
  }

  /** As pg's own query: a callback that throws must not stop the connection reading what comes next. */
  private answer(...answer: Parameters<Answer>): void {
    try {
      this.callback!(...answer);
    } catch (error) {
      process.nextTick(() => {
        throw error;
      });
    }
  }

  handleCopyInResponse(connection: Connection): void {
    connection.sendCopyFail('No source stream defined');
  }

  // Nothing to do: the statement's end is its ReadyForQuery, and it asks for its rows at once.
  handleCommandComplete(): void {}
  handleEmptyQuery(): void {}
  handlePortalSuspended(): void {}
  handleCopyData(): void {}
}
