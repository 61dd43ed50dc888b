// Runs before the test suites that need RabbitMQ (npm's pretest, pretest:integration and
// pretest:e2e scripts): connects to AMQP_URL (unset: testuser, then guest, on localhost,
// as the tests choose; see broker-url.ts) once, within a deadline, so that a machine
// without the broker or its test user fails in a few seconds with one line saying what
// to do, instead of with dozens of test failures. Exit 0 when the broker accepts the
// login, 1 otherwise.
//
//   node test/support/preflight.ts   AMQP_URL (default: see amqp/defaults.ts)
//   PREFLIGHT_TIMEOUT=3.5         seconds before giving up (default 3.5: with node's start,
//                                 the whole step stays under 5 s)
import amqp from 'amqplib';
import { BROKER_DEFAULTS } from '../../src/amqp/defaults.ts';
import { redactUrl, splitUrls } from '../../src/amqp/url.ts';
import { testBrokerUrl } from './broker-url.ts';

const raw = await testBrokerUrl();
const urlText = splitUrls(raw)[0] ?? raw;
if (!process.env.AMQP_URL && raw !== BROKER_DEFAULTS.url)
  process.stderr.write(
    `preflight: this RabbitMQ has no testuser; the tests log in as ${new URL(raw).username} (npm run setup:broker adds testuser, as compose and .ci/run have)\n`,
  );
const shown = redactUrl(urlText);
const seconds = Number(process.env.PREFLIGHT_TIMEOUT) > 0 ? Number(process.env.PREFLIGHT_TIMEOUT) : 3.5;

let url: URL | undefined;
try {
  url = new URL(urlText);
} catch {
  // amqplib says what is wrong with it below.
}
const host =
  url === undefined ? shown : `${url.hostname}:${url.port || (url.protocol === 'amqps:' ? 5671 : 5672)}`;
const user = url === undefined ? '' : decodeURIComponent(url.username || 'guest');
const vhost = url === undefined ? '/' : decodeURIComponent(url.pathname.slice(1)) || '/';
const local = url !== undefined && ['localhost', '127.0.0.1', '::1', '[::1]'].includes(url.hostname);
const isTestUser =
  user === 'testuser' && url !== undefined && decodeURIComponent(url.password) === 'testuser';
const makeUser = local && isTestUser;

function stop(line: string): never {
  process.stderr.write(`preflight: ${line}\n`);
  process.exit(1);
}

const timer = setTimeout(
  () =>
    stop(
      `no AMQP answer from ${host} within ${seconds} s (AMQP_URL=${shown}): is RabbitMQ running there, and is it RabbitMQ?`,
    ),
  seconds * 1000,
);

try {
  const connection = await amqp.connect(urlText, { timeout: seconds * 1000 });
  clearTimeout(timer);
  await connection.close().catch(() => {});
} catch (err) {
  clearTimeout(timer);
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown }).code;
  if (/ACCESS.REFUSED|403/.test(message)) {
    stop(
      makeUser
        ? `RabbitMQ at ${host} refused user testuser: run \`npm run setup:broker\` (creates testuser/testuser with all permissions on /, as .ci/run does), then the tests again`
        : `RabbitMQ at ${host} refused user ${JSON.stringify(user)} (AMQP_URL=${shown}): create that user with permissions on its vhost, or set AMQP_URL to one that exists`,
    );
  }
  if (code === 'ECONNREFUSED') {
    stop(
      local
        ? `nothing listens at ${host} (connection refused): start RabbitMQ (\`rabbitmq-server -detached\`${makeUser ? ' then `npm run setup:broker`' : ''}; or \`docker compose up -d rabbitmq\`, which has testuser)`
        : `nothing listens at ${host} (connection refused; AMQP_URL=${shown}): start RabbitMQ there or set AMQP_URL`,
    );
  }
  if (/NOT.ALLOWED|530|ConnectionOpenOk/.test(message)) {
    // Logged in, but the vhost does not exist or the user has no permissions on it.
    stop(
      makeUser && vhost === '/'
        ? `RabbitMQ at ${host} let testuser log in but not into vhost /: run \`npm run setup:broker\` (gives testuser all permissions on /, as .ci/run does), then the tests again`
        : `RabbitMQ at ${host} does not let ${JSON.stringify(user)} into vhost ${JSON.stringify(vhost)} (AMQP_URL=${shown}): it does not exist or the user has no permissions on it`,
    );
  }
  stop(
    `cannot reach RabbitMQ at AMQP_URL=${shown}: ${String(code ?? '')} ${message.split('\n')[0]}`.replace(
      /\s+/g,
      ' ',
    ),
  );
}
