import bcrypt from 'bcrypt';
import { sql } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import type { Database } from '../src/db/database.js';
import { countTokens, encodingName } from '../src/providers/models.js';
import { BENCH_MODEL, CHAT_MESSAGE, UPSTREAM_REPLY } from './workload.js';

/** What the benchmarks read and chat in, written straight to the database before the service starts. */
export interface Seed {
  userId: string;
  email: string;
  password: string;
  /** Figure 2: a project with a few prompts and messages to count. */
  readProjectId: string;
  /** Sequential chats (figures 3, 5, 9), the history cleared before each. */
  chatProjectId: string;
  /** Concurrent chats (figures 4, 6, 9) spread over these, so that no history grows long. */
  poolProjectIds: string[];
  /** Figure 8: a project with 100,000 stored messages… */
  largeHistoryProjectId: string;
  /** …and projects with 10 each, a fresh one per measured chat, so that every one has exactly 10. */
  smallHistoryProjectIds: string[];
}

export const LARGE_HISTORY = 100_000;
export const SMALL_HISTORY = 10;
const POOL_PROJECTS = 10_000;
const SMALL_HISTORY_PROJECTS = 520;
const READ_PROJECT_PROMPTS = 3;
const READ_PROJECT_MESSAGES = 20;

export async function seed(database: Database): Promise<Seed> {
  const { db } = database;
  const userId = uuidv7();
  const email = 'bench@example.com';
  const password = 'bench password 1';
  // The configured cost (12): figure 7 times logins against this hash.
  const passwordHash = await bcrypt.hash(password, 12);
  await db.execute(sql`insert into users (id, email, password_hash, name) values (${userId}, ${email}, ${passwordHash}, 'Bench')`);

  const project = async (name: string) => {
    const id = uuidv7();
    await db.execute(sql`insert into projects (id, user_id, name) values (${id}, ${userId}, ${name})`);
    return id;
  };
  const projectsNamed = async (prefix: string) => {
    // Both drivers answer with { rows }.
    const result = (await db.execute(sql`select id from projects where name like ${prefix + '%'} order by id`)) as unknown as { rows: { id: string }[] };
    return result.rows.map((row) => row.id);
  };

  const readProjectId = await project('Read');
  await db.execute(sql`insert into prompts (id, project_id, title, content)
    select gen_random_uuid(), ${readProjectId}, 'Prompt ' || i, 'You are a helpful assistant.' from generate_series(1, ${READ_PROJECT_PROMPTS}) i`);
  await insertHistory(database, sql`(select ${readProjectId}::uuid as id)`, READ_PROJECT_MESSAGES);

  const chatProjectId = await project('Chat');
  await db.execute(sql`insert into projects (id, user_id, name)
    select gen_random_uuid(), ${userId}, 'Pool ' || i from generate_series(1, ${POOL_PROJECTS}) i`);

  const largeHistoryProjectId = await project('History large');
  await insertHistory(database, sql`(select ${largeHistoryProjectId}::uuid as id)`, LARGE_HISTORY);
  await db.execute(sql`insert into projects (id, user_id, name)
    select gen_random_uuid(), ${userId}, 'History small ' || i from generate_series(1, ${SMALL_HISTORY_PROJECTS}) i`);
  // Two short: figure 8 chats once in each before the chat it measures, which then finds SMALL_HISTORY.
  await insertHistory(database, sql`(select id from projects where name like 'History small %')`, SMALL_HISTORY - 2);

  // The planner sees the tables as a long-running service would, not as freshly loaded.
  await db.execute(sql`analyze`);
  return {
    userId,
    email,
    password,
    readProjectId,
    chatProjectId,
    poolProjectIds: await projectsNamed('Pool '),
    largeHistoryProjectId,
    smallHistoryProjectIds: await projectsNamed('History small '),
  };
}

/**
 * `count` messages in each project that `projects` selects, alternating the benchmarks' own question
 * and answer, one second apart and ending a day ago: older than anything the benchmarks add. Each
 * with its token count, as the service stores it.
 */
async function insertHistory(database: Database, projects: ReturnType<typeof sql>, count: number): Promise<void> {
  const [questionTokens, replyTokens] = [CHAT_MESSAGE, UPSTREAM_REPLY].map((text) => countTokens(text, BENCH_MODEL));
  await database.db.execute(sql`insert into messages (id, project_id, role, content, status, tokens, token_encoding, created_at)
    select gen_random_uuid(), p.id,
      case when i % 2 = 1 then 'user' else 'assistant' end,
      case when i % 2 = 1 then ${CHAT_MESSAGE} else ${UPSTREAM_REPLY} end,
      'complete',
      case when i % 2 = 1 then ${questionTokens}::int else ${replyTokens}::int end, ${encodingName(BENCH_MODEL)},
      now() - interval '1 day' - make_interval(secs => ${count} - i)
    from ${projects} p cross join generate_series(1, ${count}) i`);
}
