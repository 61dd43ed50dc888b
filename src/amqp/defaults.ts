// The broker names the service and its producers share, declared once: the service's
// options default to them and the client's do too, so that a producer built with no
// options talks to a service started with none. They are the Python tool's names.

export const BROKER_DEFAULTS = {
  /** The seed's account; see defaultUrls() for what is tried when no URL is given. */
  url: 'amqp://testuser:testuser@localhost:5672/',
  exchange: 'curio_amqp_exchange',
  queue: 'curio_amqp_queue',
  routingKey: 'curio_amqp',
} as const;

/** RabbitMQ's own default account, which a stock local broker has (and only on localhost). */
export const GUEST_URL = 'amqp://guest:guest@localhost:5672/';

/**
 * The accounts tried, in order, when the user gave no URL: the seed's `testuser` (what
 * `docker compose up` and the tests' set-up create), then RabbitMQ's own `guest`, so that
 * a fresh clone runs against a stock local RabbitMQ with no set-up step.
 */
export const DEFAULT_URLS: readonly string[] = [BROKER_DEFAULTS.url, GUEST_URL];
