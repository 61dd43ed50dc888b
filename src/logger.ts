// One root logger (pino, JSON to stdout); components take children with their bindings.
// Secrets are redacted by path, and task payloads are never logged.
import pino, { type DestinationStream, type Logger } from 'pino';

export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino(
    {
      name: 'amqp-concurrency',
      level,
      redact: {
        paths: [
          'amqpUrl',
          'url',
          '*.amqpUrl',
          '*.url',
          'shutdownToken',
          '*.shutdownToken',
          'req.headers.authorization',
        ],
        censor: '[redacted]',
      },
    },
    destination,
  );
}
