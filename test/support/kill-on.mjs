// Preloaded (`node --import`) by tests that cut a command short where a crash could: KILL_ON=`<call>:<end>:<n>`
// kills the process (SIGKILL) at its n-th call (1 by default) of `<call>` of node:fs/promises (rm, rename)
// on a path that exists and ends with `<end>`, before the call does anything.
import { existsSync } from 'node:fs';
import fsp from 'node:fs/promises';
import { syncBuiltinESMExports } from 'node:module';

const [call, end, nth = '1'] = (process.env.KILL_ON ?? '').split(':');
if (call && end) {
  const original = fsp[call];
  let calls = 0;
  fsp[call] = (path, ...rest) => {
    if (String(path).endsWith(end) && existsSync(path) && ++calls === Number(nth)) process.kill(process.pid, 'SIGKILL');
    return original(path, ...rest);
  };
  syncBuiltinESMExports();
}
