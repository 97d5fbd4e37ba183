// There is no Docker engine on the CI machines, so the image is never built there: these tests check
// instead what the Dockerfile, .dockerignore and compose.yaml say, and that the image's production-only
// install holds everything the compiled server imports.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Copy, DockerfileParser, Env, From, Healthcheck, type Instruction, JSONInstruction } from 'dockerfile-ast';
import { parse as parseYaml } from 'yaml';
import { describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..', '..');
const read = (file: string) => readFileSync(join(root, file), 'utf8');

interface Stage {
  from: From;
  name: string | null;
  instructions: Instruction[];
}

/** The Dockerfile's stages in order, each with the instructions that follow its FROM. */
function stages(): Stage[] {
  const result: Stage[] = [];
  for (const instruction of DockerfileParser.parse(read('Dockerfile')).getInstructions()) {
    if (instruction instanceof From) result.push({ from: instruction, name: instruction.getBuildStage(), instructions: [] });
    else result.at(-1)?.instructions.push(instruction);
  }
  return result;
}

const ofKind = (stage: Stage, keyword: string) => stage.instructions.filter((i) => i.getKeyword() === keyword);
const runs = (stage: Stage) => ofKind(stage, 'RUN').map((i) => i.getArgumentsContent() ?? '');
const fromFlag = (copy: Copy) => copy.getFromFlag()?.getValue() ?? null;

describe('Dockerfile', () => {
  const all = stages();
  const final = all.at(-1)!;
  const stage = (name: string | null) => all.find((s) => s.name === name);
  const copies = (s: Stage) => ofKind(s, 'COPY') as Copy[];

  it('is multi-stage, ending on a Node 20 image', () => {
    expect(all.length).toBeGreaterThanOrEqual(2);
    expect(final.from.getImageName()).toBe('node');
    expect(final.from.getImageTag()).toMatch(/^20(\.|-|$)/);
  });

  it('builds in a stage that installs everything, and ships production dependencies only', () => {
    const dist = copies(final).find((c) => c.getArguments()[0]?.getValue().endsWith('/dist'));
    const modules = copies(final).find((c) => c.getArguments()[0]?.getValue().endsWith('/node_modules'));
    expect(dist && modules, 'the final stage copies dist and node_modules from earlier stages').toBeTruthy();
    const build = stage(fromFlag(dist!))!;
    expect(runs(build).some((r) => /^npm ci\b/.test(r))).toBe(true);
    expect(runs(build).some((r) => r.includes('npm run build'))).toBe(true);
    expect(runs(stage(fromFlag(modules!))!).some((r) => r.includes('npm ci --omit=dev'))).toBe(true);
    expect(runs(final).some((r) => /\bnpm (ci|install)\b/.test(r)), 'no install in the final stage').toBe(false);
    const env = (ofKind(final, 'ENV') as Env[]).flatMap((e) => e.getProperties()).map((p) => [p.getName(), p.getValue()]);
    expect(env).toContainEqual(['NODE_ENV', 'production']);
  });

  it('runs dist/server.js with node itself as a non-root user, and stops on SIGTERM', () => {
    const users = ofKind(final, 'USER').map((u) => u.getArgumentsContent());
    expect(users.length).toBeGreaterThan(0);
    expect(users.at(-1)).not.toMatch(/^(root|0)(:|$)/);

    const cmd = ofKind(final, 'CMD').at(-1) as JSONInstruction;
    expect(cmd.getJSONStrings().map((s) => s.getJSONValue())).toEqual(['node', 'dist/server.js']);
    expect(ofKind(final, 'ENTRYPOINT')).toEqual([]);

    expect(ofKind(final, 'STOPSIGNAL').map((s) => s.getArgumentsContent())).toEqual(['SIGTERM']);
    expect(ofKind(final, 'EXPOSE').map((s) => s.getArgumentsContent())).toContain('3000');
  });

  it('has a health check that passes while GET /health answers 200 on PORT, and fails otherwise', async () => {
    const healthcheck = ofKind(final, 'HEALTHCHECK').at(-1) as Healthcheck;
    expect(healthcheck.getSubcommand()?.getValue()).toBe('CMD');
    const content = healthcheck.getArgumentsContent()!;
    const [command, ...args] = JSON.parse(content.slice(content.indexOf('['))) as string[];
    expect(command).toBe('node'); // the image has no curl or wget
    for (const [status, expected] of [
      [200, 0],
      [503, 1],
    ] as const) {
      const server = createServer((request, response) => {
        response.statusCode = request.url === '/health' ? status : 404;
        response.end();
      });
      server.listen(0, '127.0.0.1');
      await once(server, 'listening');
      try {
        const child = spawn(process.execPath, args, { env: { PORT: String((server.address() as AddressInfo).port) }, stdio: 'ignore' });
        const [code] = (await once(child, 'close')) as [number];
        expect(code, `health check with /health answering ${status}`).toBe(expected);
      } finally {
        server.close();
      }
    }
  });

  it('copies only what exists in the repository, is not ignored, or comes from an earlier stage', () => {
    const ignored = new Set(dockerignore());
    all.forEach((s, index) => {
      for (const copy of copies(s)) {
        const from = fromFlag(copy);
        const sources = copy.getArguments().slice(0, -1).map((a) => a.getValue());
        if (from) {
          expect(all.slice(0, index).map((earlier) => earlier.name)).toContain(from);
          continue;
        }
        for (const source of sources) {
          expect(existsSync(join(root, source)), `${source} exists`).toBe(true);
          expect(ignored.has(source.split('/')[0]!), `${source} is not in .dockerignore`).toBe(false);
        }
      }
    });
  });

  it('has a .dockerignore that keeps installs, build output, data, secrets and history out', () => {
    expect(dockerignore()).toEqual(expect.arrayContaining(['node_modules', 'dist', 'data', '.env', '.git']));
  });
});

function dockerignore(): string[] {
  return read('.dockerignore')
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line && !line.startsWith('#'));
}

describe('compose.yaml', () => {
  type Service = {
    build?: unknown;
    environment?: Record<string, string>;
    healthcheck?: { test?: unknown };
    depends_on?: Record<string, { condition?: string }>;
    volumes?: string[];
  };
  const compose = parseYaml(read('compose.yaml')) as { services: Record<string, Service> };
  const { app, postgres, redis } = compose.services;

  it('runs the image built here beside PostgreSQL and Redis, starting once both are healthy', () => {
    expect(app?.build).toBe('.');
    expect(postgres?.healthcheck?.test).toBeTruthy();
    expect(redis?.healthcheck?.test).toBeTruthy();
    expect(app?.depends_on).toEqual({ postgres: { condition: 'service_healthy' }, redis: { condition: 'service_healthy' } });
    expect(app?.environment?.DATABASE_URL).toMatch(/^postgres:\/\/[^@]+@postgres:5432\//);
    expect(app?.environment?.REDIS_URL).toMatch(/^redis:\/\/redis:6379/);
    expect(app?.volumes?.some((v) => v.split(':')[1] === '/data')).toBe(true);
  });

  it('passes through the variables the README says it does', () => {
    const container = /^## Container\n([\s\S]*?)^## /m.exec(read('README.md'))![1]!;
    const passed = Object.entries(app?.environment ?? {})
      .filter(([, value]) => /^\$\{\w+:-[^}]*\}$/.test(value))
      .map(([name]) => name);
    expect(passed.length).toBeGreaterThan(0);
    expect(passed.filter((name) => !container.includes(`\`${name}\``))).toEqual([]);
  });

  it('requires the JWT secret from the environment and hard-codes no secret', () => {
    expect(app?.environment?.JWT_SECRET).toMatch(/^\$\{JWT_SECRET:\?[^}]+\}$/);
    for (const [service, { environment = {} }] of Object.entries(compose.services)) {
      for (const [name, value] of Object.entries(environment)) {
        const where = `${service}.${name}`;
        if (/SECRET|PASSWORD|_KEY|TOKEN/.test(name)) expect(String(value), where).toMatch(/^\$\{[A-Z_]+(:?[-?][^}]*)?\}$/);
        const password = /^\w+:\/\/[^:/@]+:([^@]*)@/.exec(String(value))?.[1];
        if (password !== undefined) expect(password, `${where} password`).toMatch(/^\$\{[^}]+\}$/);
      }
    }
  });
});

describe('production dependencies', () => {
  it('hold every package the compiled server can import (it runs with plain node, without devDependencies)', () => {
    const { dependencies } = JSON.parse(read('package.json')) as { dependencies: Record<string, string> };
    const imported = new Set<string>();
    for (const file of readdirSync(join(root, 'src'), { recursive: true, encoding: 'utf8' })) {
      if (!file.endsWith('.ts')) continue;
      // `import type` is erased by the compiler; every other import form stays in the JavaScript.
      const pattern = /^\s*(?:import|export)\s+(?!type\s)(?:[^;'"]*?\sfrom\s+)?['"]([^'"]+)['"]|\bimport\(\s*['"]([^'"]+)['"]\s*\)/gm;
      for (const match of read(join('src', file)).matchAll(pattern)) {
        const specifier = match[1] ?? match[2]!;
        if (specifier.startsWith('.') || specifier.startsWith('node:')) continue;
        imported.add(specifier.split('/').slice(0, specifier.startsWith('@') ? 2 : 1).join('/'));
      }
    }
    expect(imported.size).toBeGreaterThan(5);
    expect([...imported].filter((name) => !(name in dependencies))).toEqual([]);
  });
});
