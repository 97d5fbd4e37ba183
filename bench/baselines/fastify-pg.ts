import { PGlite } from '@electric-sql/pglite';
import Fastify from 'fastify';
import pg from 'pg';

/**
 * Figure 2's baseline: a bare Fastify route running the one statement with which the service reads a
 * project for GET /api/v1/projects/:projectId (the project and its counts, as drizzle writes it), on
 * pg, with no authentication and no validation: the owner is fixed (OWNER_ID). On the embedded
 * database it reads its own copy of the bench data (PGLITE_DIR): a PGlite folder serves one process.
 */
const PROJECT_WITH_COUNTS = `select "id", "user_id", "name", "description", "provider", "model", "created_at", "updated_at",
  (select count(*) from "prompts" where "prompts"."project_id" = "projects"."id"),
  (select count(*) from "messages" where "messages"."project_id" = "projects"."id"),
  (select count(*) from "files" where "files"."project_id" = "projects"."id")
  from "projects" where ("projects"."id" = $1 and "projects"."user_id" = $2)`;

type Query = (text: string, params: unknown[]) => Promise<{ rows: unknown[][] }>;

async function connect(): Promise<Query> {
  if (process.env.DATABASE_URL) {
    // The service's pool size.
    const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 20 });
    // Prepared once per connection, as the service's statement is (`project_of_user`): unnamed, it was
    // parsed and planned again on every request, which cost the database twice the service's work.
    return (text, params) => pool.query({ name: 'project_with_counts', text, values: params, rowMode: 'array' });
  }
  const db = await PGlite.create(process.env.PGLITE_DIR);
  return (text, params) => db.query(text, params, { rowMode: 'array' });
}

const query = await connect();
const ownerId = process.env.OWNER_ID;
const app = Fastify();

app.get<{ Params: { projectId: string } }>('/api/v1/projects/:projectId', async (request, reply) => {
  const { rows } = await query(PROJECT_WITH_COUNTS, [request.params.projectId, ownerId]);
  const row = rows[0] as [string, string, string, string | null, string | null, string | null, Date, Date, unknown, unknown, unknown] | undefined;
  if (!row) return reply.code(404).send();
  const [id, , name, description, provider, model, createdAt, updatedAt, prompts, messages, files] = row;
  return {
    id,
    name,
    description,
    provider,
    model,
    createdAt: createdAt.toISOString(),
    updatedAt: updatedAt.toISOString(),
    counts: { prompts: Number(prompts), messages: Number(messages), files: Number(files) },
  };
});

await app.listen({ port: Number(process.env.PORT), host: '127.0.0.1' });
