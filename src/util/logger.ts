// One root logger (pino, JSON to stdout); components take children with their bindings.
// Secrets are redacted by path, and task payloads are never logged. Errors are logged
// one way: `log.warn({ err }, '...')`, and the `err` serializer below turns whatever was
// thrown (an Error, a plain object a library threw, a string) into {type, message, code,
// stack}, never a throw of its own.
import pino, { type DestinationStream, type Logger } from 'pino';
import { serializeError } from '../errors.ts';

/** How every log line shows an error. */
export function loggedError(err: unknown): { type: string; message: string; code?: string; stack?: string } {
  const { name, message, code, stack } = serializeError(err);
  return {
    type: name,
    message,
    ...(code === undefined ? {} : { code }),
    ...(stack === undefined ? {} : { stack }),
  };
}

export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino(
    {
      name: 'amqp-concurrency',
      level,
      serializers: { err: loggedError },
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
