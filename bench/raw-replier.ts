// The latency reference: a raw amqplib consumer that does what the service does for a
// task with reply_to, with no pool and no worker: stamp the start, publish the reply on
// a confirm channel, ack once the broker confirms it. Started by bench.ts. Its prefetch
// is the raw consumer's (1000): the flat-out replies are measured against it, and a small
// window would make its ceiling the confirm round trip rather than the broker.
import amqp from 'amqplib';
import { stamp } from './tasks.ts';

const [url, queue] = process.argv.slice(2) as [string, string];
const consuming = await amqp.connect(url);
const publishing = await amqp.connect(url);
const channel = await consuming.createChannel();
const replies = await publishing.createConfirmChannel();
await channel.assertQueue(queue, { durable: true });
await channel.prefetch(1000);
await channel.consume(queue, (m) => {
  if (m === null) return;
  // The start as the service's `stamp` task reads it (the clock the bench subtracts from).
  const result = stamp();
  const body = Buffer.from(JSON.stringify({ ok: true, result }));
  replies.publish('', m.properties.replyTo, body, { correlationId: m.properties.correlationId }, () =>
    channel.ack(m),
  );
});
process.send?.('ready');
process.on('SIGTERM', async () => {
  await consuming.close();
  await publishing.close();
  process.exit(0);
});
