/**
 * Loaded into the service with `--import` by `npm run bench -- --heap-prof`: V8's sampling heap profiler
 * with the objects already collected counted, which Node's own `--heap-prof` leaves out (it reports what
 * is still alive at exit), so that a profile says what a figure allocated, not what it kept. Sampling
 * starts on SIGUSR2, which the harness sends once the service answers (its start-up left out), and the
 * profile is written to BENCH_HEAP_PROFILE_DIR as the service exits.
 */
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import { join } from 'node:path';

const session = new Session();
session.connect();
let sampling = false;
process.on('SIGUSR2', () => {
  if (sampling) return;
  const options = { samplingInterval: 4096, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true };
  session.post('HeapProfiler.startSampling', options, (error) => (sampling = !error));
});
process.on('exit', () => {
  if (!sampling) return;
  // The inspector answers on this thread: the callback runs before `post` returns.
  session.post('HeapProfiler.stopSampling', (error, result) => {
    if (!error) writeFileSync(join(process.env.BENCH_HEAP_PROFILE_DIR, `Heap.${process.pid}.heapprofile`), JSON.stringify(result.profile));
  });
});
