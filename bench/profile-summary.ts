import { readFileSync } from 'node:fs';

/**
 * Where a V8 CPU profile (node --cpu-prof) spent its busy time (idle left out): self time by package
 * and by function.
 *   node --import tsx bench/profile-summary.ts bench/profiles/<file>.cpuprofile
 */

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

export interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

export function summarizeProfile(profile: CpuProfile, top = 25): string {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const selfMs = new Map<number, number>();
  // timeDeltas[i] is the time before sample i: it belongs to the sample before it.
  profile.samples.forEach((id, i) => {
    const delta = profile.timeDeltas[i + 1] ?? 0;
    selfMs.set(id, (selfMs.get(id) ?? 0) + delta / 1000);
  });
  const total = [...selfMs.values()].reduce((sum, ms) => sum + ms, 0);
  let idle = 0;
  const functions = new Map<string, number>();
  const packages = new Map<string, number>();
  for (const [id, ms] of selfMs) {
    const { functionName, url, lineNumber } = byId.get(id)!.callFrame;
    if (functionName === '(idle)') {
      idle += ms;
      continue;
    }
    const name = `${functionName || '(anonymous)'} ${shortUrl(url)}${url ? `:${lineNumber + 1}` : ''}`;
    functions.set(name, (functions.get(name) ?? 0) + ms);
    packages.set(packageOf(functionName, url), (packages.get(packageOf(functionName, url)) ?? 0) + ms);
  }
  const table = (entries: Map<string, number>, limit: number) =>
    [...entries]
      .sort((a, b) => b[1] - a[1])
      .slice(0, limit)
      .map(([name, ms]) => `${((100 * ms) / (total - idle)).toFixed(1).padStart(5)}%  ${ms.toFixed(0).padStart(7)} ms  ${name}`);
  return [
    `${(total / 1000).toFixed(1)} s sampled, ${((total - idle) / 1000).toFixed(1)} s of it busy; shares below are of the busy time`,
    '',
    'self time by package:',
    ...table(packages, 15),
    '',
    'self time by function:',
    ...table(functions, top),
  ].join('\n');
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
  return url.replace(/^file:\/\/.*?\/(node_modules|src|dist|bench)\//, '$1/');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const file = process.argv[2];
  if (!file) throw new Error('usage: profile-summary.ts <file.cpuprofile>');
  process.stdout.write(`${summarizeProfile(JSON.parse(readFileSync(file, 'utf8')) as CpuProfile)}\n`);
}
