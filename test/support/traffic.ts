import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { inArray } from 'drizzle-orm';
import type { Db } from '../../src/db/database.js';
import { messages, projects, prompts, users } from '../../src/db/schema.js';
import { readSse, type SseEvent } from './sse.js';

/** How one request ended. */
export interface Outcome {
  op: string;
  /**
   * The HTTP status; for a stream that ended with an `error` event, that problem's status; 0 when no
   * answer came (connection refused or reset, or a stream cut with no final event).
   */
  status: number;
  /** The problem code of a failure, or the network error's code. */
  code?: string;
  /** performance.now() at both ends: monotonic, where the wall clock may jump. */
  startedAt: number;
  endedAt: number;
}

/** Ids of everything the server acknowledged (2xx, or a stream event): each must be stored. */
export interface Acknowledged {
  users: Set<string>;
  projects: Set<string>;
  prompts: Set<string>;
  messages: Set<string>;
}

/** A signed-up user with a project to work in. */
export interface Session {
  email: string;
  password: string;
  auth: { authorization: string };
  projectId: string;
}

interface Answer {
  status: number;
  body: Record<string, unknown>;
}

interface MessageIds {
  userMessage: { id: string };
  assistantMessage: { id: string };
}

const PASSWORD = 'traffic password';

/**
 * Talks to the API over HTTP as a client would, reporting every request's outcome and keeping the ids
 * of what was acknowledged. Requests that fail are reported, never thrown.
 */
export class TrafficClient {
  readonly acknowledged: Acknowledged = { users: new Set(), projects: new Set(), prompts: new Set(), messages: new Set() };

  constructor(
    private readonly baseUrl: string,
    private readonly onOutcome: (outcome: Outcome) => void = () => {},
  ) {}

  /** Registers a user and creates a project; undefined when either failed. */
  async signUp(): Promise<Session | undefined> {
    const user = await this.register();
    if (!user) return undefined;
    const projectId = await this.createProject(user);
    return projectId ? { ...user, projectId } : undefined;
  }

  async register(): Promise<Omit<Session, 'projectId'> | undefined> {
    const email = `traffic-${randomUUID()}@example.com`;
    const answer = await this.send('register', 'POST', '/api/v1/auth/register', { body: { email, password: PASSWORD, name: 'Traffic' } });
    if (answer.status !== 201) return undefined;
    const { user, token } = answer.body as { user: { id: string }; token: string };
    this.acknowledged.users.add(user.id);
    return { email, password: PASSWORD, auth: { authorization: `Bearer ${token}` } };
  }

  login(session: Session): Promise<Answer> {
    return this.send('login', 'POST', '/api/v1/auth/login', { body: { email: session.email, password: session.password } });
  }

  async createProject(session: Pick<Session, 'auth'>): Promise<string | undefined> {
    const answer = await this.send('create project', 'POST', '/api/v1/projects', { session, body: { name: 'Traffic project' } });
    if (answer.status !== 201) return undefined;
    const { id } = answer.body as { id: string };
    this.acknowledged.projects.add(id);
    return id;
  }

  async createPrompt(session: Session, content: string): Promise<void> {
    const answer = await this.send('create prompt', 'POST', `/api/v1/projects/${session.projectId}/prompts`, {
      session,
      body: { title: 'Traffic prompt', content },
    });
    if (answer.status === 201) this.acknowledged.prompts.add((answer.body as { id: string }).id);
  }

  readProjects(session: Session): Promise<Answer> {
    return this.send('list projects', 'GET', '/api/v1/projects?limit=10', { session });
  }

  readMessages(session: Session): Promise<Answer> {
    return this.send('list messages', 'GET', `/api/v1/projects/${session.projectId}/messages?limit=20`, { session });
  }

  /** A JSON chat turn; the answer when it was 200. */
  async chat(session: Session, message: string, headers: Record<string, string> = {}): Promise<Answer> {
    const answer = await this.send('chat', 'POST', `/api/v1/projects/${session.projectId}/chat`, { session, body: { message }, headers });
    if (answer.status === 200) this.acknowledgeTurn(answer.body as unknown as MessageIds);
    return answer;
  }

  /** The same keyed chat twice: the second must replay the first without a new turn. */
  async idempotentChat(session: Session, message: string): Promise<void> {
    const key = { 'idempotency-key': randomUUID() };
    const first = await this.chat(session, message, key);
    if (first.status === 200) await this.chat(session, message, key);
  }

  /** A streamed chat turn; resolves with every event received (each also to `onEvent`), however the stream ended. */
  async chatStream(session: Session, message: string, onEvent: (event: SseEvent) => void = () => {}): Promise<SseEvent[]> {
    const startedAt = performance.now();
    const report = (status: number, code?: string) => this.onOutcome({ op: 'chat stream', status, code, startedAt, endedAt: performance.now() });
    let response: Response;
    try {
      response = await this.fetch('POST', `/api/v1/projects/${session.projectId}/chat`, { session, body: { message, stream: true } });
    } catch (error) {
      report(0, networkCode(error));
      return [];
    }
    if (!response.headers.get('content-type')?.startsWith('text/event-stream')) {
      const body = await readJson(response);
      report(response.status, problemCode(body));
      return [];
    }
    const events: SseEvent[] = [];
    try {
      await readSse(response, (event) => {
        events.push(event);
        // Acknowledged as they come: the question is stored before its event is sent.
        if (event.event === 'user_message') this.acknowledged.messages.add((event.data.userMessage as { id: string }).id);
        if (event.event === 'done') this.acknowledged.messages.add((event.data.assistantMessage as { id: string }).id);
        onEvent(event);
      });
    } catch (error) {
      report(0, networkCode(error));
      return events;
    }
    const last = events.at(-1);
    if (last?.event === 'done') report(200);
    else if (last?.event === 'error') report(Number(last.data.status), String(last.data.code));
    else report(0, 'STREAM_CUT');
    return events;
  }

  private acknowledgeTurn(result: MessageIds): void {
    this.acknowledged.messages.add(result.userMessage.id);
    this.acknowledged.messages.add(result.assistantMessage.id);
  }

  private async send(
    op: string,
    method: string,
    path: string,
    init: { session?: Pick<Session, 'auth'>; body?: unknown; headers?: Record<string, string> },
  ): Promise<Answer> {
    const startedAt = performance.now();
    let answer: Answer;
    try {
      const response = await this.fetch(method, path, init);
      answer = { status: response.status, body: await readJson(response) };
      this.onOutcome({ op, status: answer.status, code: problemCode(answer.body), startedAt, endedAt: performance.now() });
    } catch (error) {
      answer = { status: 0, body: {} };
      this.onOutcome({ op, status: 0, code: networkCode(error), startedAt, endedAt: performance.now() });
    }
    return answer;
  }

  private fetch(method: string, path: string, init: { session?: Pick<Session, 'auth'>; body?: unknown; headers?: Record<string, string> }) {
    return fetch(`${this.baseUrl}${path}`, {
      method,
      headers: {
        ...init.session?.auth,
        ...(init.body === undefined ? {} : { 'content-type': 'application/json' }),
        ...init.headers,
      },
      body: init.body === undefined ? undefined : JSON.stringify(init.body),
    });
  }
}

async function readJson(response: Response): Promise<Record<string, unknown>> {
  const text = await response.text();
  try {
    return text ? (JSON.parse(text) as Record<string, unknown>) : {};
  } catch {
    return { unparsed: text };
  }
}

function problemCode(body: Record<string, unknown>): string | undefined {
  return typeof body.code === 'string' ? body.code : undefined;
}

function networkCode(error: unknown): string {
  const cause = (error as { cause?: { code?: unknown } }).cause;
  return String(cause?.code ?? (error as Error).name);
}

type Step = (client: TrafficClient, session: Session, tag: string) => Promise<unknown>;

/** What every user of the mixed traffic does, in turn: writes, reads, JSON and streamed chat, sign-ups. */
const MIX: Step[] = [
  (client, session, tag) => client.chat(session, `question ${tag}`),
  (client, session) => client.readMessages(session),
  (client, session, tag) => client.chatStream(session, `streamed question ${tag}`),
  (client, session) => client.readProjects(session),
  (client, session, tag) => client.idempotentChat(session, `keyed question ${tag}`),
  // A new project and a prompt in it: the chat project's prompts, all sent with every turn, stay as they are.
  async (client, session, tag) => {
    const projectId = await client.createProject(session);
    if (projectId) await client.createPrompt({ ...session, projectId }, `prompt ${tag}`);
  },
  (client, session) => client.login(session),
  (client) => client.register(),
];

/**
 * Mixed traffic from `users` simulated users, each sending its next request as soon as the last one
 * ended (after `pauseMs`), until stopped. A user signs up first, and tries again until that works.
 */
export class MixedTraffic {
  private stopping = false;
  private readonly users: Promise<void>[];

  constructor(
    private readonly client: TrafficClient,
    options: { users: number; pauseMs: number },
  ) {
    this.users = Array.from({ length: options.users }, (_, user) => this.simulate(user, options.pauseMs));
  }

  /** Lets every request under way finish, then resolves. */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(this.users);
  }

  private async simulate(user: number, pauseMs: number): Promise<void> {
    let session: Session | undefined;
    for (let turn = 0; !this.stopping; turn++) {
      session ??= await this.client.signUp();
      if (session) await MIX[turn % MIX.length]!(this.client, session, `${user}-${turn}`);
      await sleep(pauseMs);
    }
  }
}

/** The acknowledged ids that are not in the database, by table. */
export async function missingWrites(db: Db, acknowledged: Acknowledged): Promise<Record<keyof Acknowledged, string[]>> {
  const tables = { users, projects, prompts, messages };
  const missing = { users: [], projects: [], prompts: [], messages: [] } as Record<keyof Acknowledged, string[]>;
  for (const name of Object.keys(tables) as (keyof Acknowledged)[]) {
    const table = tables[name];
    const ids = [...acknowledged[name]];
    const found = new Set<string>();
    // In slices: a statement takes at most 65,535 parameters.
    for (let i = 0; i < ids.length; i += 10_000) {
      const rows = await db.select({ id: table.id }).from(table).where(inArray(table.id, ids.slice(i, i + 10_000)));
      for (const row of rows) found.add(row.id);
    }
    missing[name] = ids.filter((id) => !found.has(id));
  }
  return missing;
}
