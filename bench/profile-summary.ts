import { readFileSync } from 'node:fs';

/**
 * Where a V8 CPU profile (node --cpu-prof) spent its busy time (idle left out), or where a sampling heap
 * profile's bytes were allocated: by package and by function.
 *   node --import tsx bench/profile-summary.ts bench/profiles/<file>.cpuprofile
 *   node --import tsx bench/profile-summary.ts bench/profiles/<file>.heapprofile
 */

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

function summarizeProfile(profile: CpuProfile, top = 25): string {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const selfMs = new Map<number, number>();
  // timeDeltas[i] is the time before sample i: it belongs to the sample before it.
  profile.samples.forEach((id, i) => {
    const delta = profile.timeDeltas[i + 1] ?? 0;
    selfMs.set(id, (selfMs.get(id) ?? 0) + delta / 1000);
  });
  const total = [...selfMs.values()].reduce((sum, ms) => sum + ms, 0);
  const busy = new Self();
  for (const [id, ms] of selfMs) {
    const { callFrame } = byId.get(id)!;
    if (callFrame.functionName !== '(idle)') busy.add(callFrame, ms);
  }
  return [
    `${(total / 1000).toFixed(1)} s sampled, ${(busy.total / 1000).toFixed(1)} s of it busy; shares below are of the busy time`,
    ...busy.tables(top, 'time', (ms) => `${ms.toFixed(0).padStart(7)} ms`),
  ].join('\n');
}

/** A sampling heap profile (`npm run bench -- --heap-prof`, see bench/heap-sampler.mjs). */
interface HeapProfile {
  head: HeapNode;
}

interface HeapNode {
  callFrame: CallFrame;
  /** Bytes sampled as allocated here (collected since or not). */
  selfSize: number;
  children: HeapNode[];
}

/** Where a sampling heap profile's bytes were allocated: by package and by function. */
function summarizeHeapProfile(profile: HeapProfile, top = 25): string {
  const allocated = new Self();
  const visit = (node: HeapNode) => {
    if (node.selfSize) allocated.add(node.callFrame, node.selfSize);
    node.children.forEach(visit);
  };
  visit(profile.head);
  return [
    `${(allocated.total / 1e6).toFixed(1)} MB allocated (sampled); shares below are of it`,
    ...allocated.tables(top, 'bytes', (bytes) => `${(bytes / 1e3).toFixed(0).padStart(7)} KB`),
  ].join('\n');
}

type CallFrame = ProfileNode['callFrame'];

/** What was spent where (time, bytes), by package and by function. */
class Self {
  readonly functions = new Map<string, number>();
  readonly packages = new Map<string, number>();
  total = 0;

  add({ functionName, url, lineNumber }: CallFrame, amount: number): void {
    const name = `${functionName || '(anonymous)'} ${shortUrl(url)}${url ? `:${lineNumber + 1}` : ''}`;
    const dependency = packageOf(functionName, url);
    this.functions.set(name, (this.functions.get(name) ?? 0) + amount);
    this.packages.set(dependency, (this.packages.get(dependency) ?? 0) + amount);
    this.total += amount;
  }

  tables(top: number, measure: string, format: (amount: number) => string): string[] {
    const table = (entries: Map<string, number>, limit: number) =>
      [...entries]
        .sort((a, b) => b[1] - a[1])
        .slice(0, limit)
        .map(([name, amount]) => `${((100 * amount) / this.total).toFixed(1).padStart(5)}%  ${format(amount)}  ${name}`);
    return ['', `self ${measure} by package:`, ...table(this.packages, 15), '', `self ${measure} by function:`, ...table(this.functions, top)];
  }
}

/** `node_modules/<package>`, `src/<folder>` (`dist/<folder>`, the build's), `node:<internal>`, or V8's own entries ((idle), (garbage collector)). */
function packageOf(functionName: string, url: string): string {
  if (!url) return functionName.startsWith('(') ? functionName : '(native)';
  const dependency = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (dependency) return dependency[1]!;
  if (url.startsWith('node:')) return `node:${url.slice(5).split('/')[0] === 'internal' ? url.slice(5).split('/')[1] : url.slice(5)}`;
  const source = /\/(src|dist|bench)\/(.+)$/.exec(url);
  return source ? `${source[1]}/${source[2]!.split('/')[0]}` : url;
}

function shortUrl(url: string): string {
  // A CPU profile names a file by its URL; a heap profile names a CommonJS one by its path.
  return url.replace(/^(?:file:\/\/)?.*?\/(node_modules|src|dist|bench)\//, '$1/');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const file = process.argv[2];
  if (!file) throw new Error('usage: profile-summary.ts <file.cpuprofile | file.heapprofile>');
  process.stdout.write(`${summarizeFile(file)}\n`);
}

/** A CPU profile's summary, or a heap profile's (by the file's name). */
export function summarizeFile(file: string): string {
  const profile: unknown = JSON.parse(readFileSync(file, 'utf8'));
  return file.endsWith('.heapprofile') ? summarizeHeapProfile(profile as HeapProfile) : summarizeProfile(profile as CpuProfile);
}
