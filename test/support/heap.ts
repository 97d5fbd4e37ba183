import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

// A full collection on demand, without starting the test process with --expose-gc.
setFlagsFromString('--expose-gc');
const collectGarbage = runInNewContext('gc') as () => void;

/** Bytes of heap still in use after full collections: what something keeps reachable. */
export function reachableHeapBytes(): number {
  return afterFullCollections().heapUsed;
}

/** Bytes of Buffers and other ArrayBuffers (outside the heap) still reachable after full collections. */
export function reachableBufferBytes(): number {
  return afterFullCollections().arrayBuffers;
}

function afterFullCollections(): NodeJS.MemoryUsage {
  // Twice: what the first collection frees can let the second free more (weak references, finalizers).
  collectGarbage();
  collectGarbage();
  return process.memoryUsage();
}
