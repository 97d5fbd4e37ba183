import Fastify from 'fastify';
for (const delay of [0, 'micro', 'ready']) {
  const app = Fastify();
  app.get('/', async () => 'x');
  let p;
  if (delay === 'ready') { await app.ready(); p = app.listen({ port: 0 }); }
  else p = app.listen({ port: 0 });
  if (delay === 'micro') await Promise.resolve();
  const c = app.close().then(() => 'closed', (e) => 'close failed ' + e.message);
  try { const a = await p; console.log(delay, 'listen ok', a, 'listening?', app.server.listening); } catch (e) { console.log(delay, 'listen failed', e.code, e.message, 'syscall' in e); }
  console.log(delay, await c);
}
