// The default task module: every exported function is a task that a message can name.
//   {"func": "test", "args": [1, 2]}          -> 3
//   {"func": "sleep", "args": [0.5]}          -> sleeps, then null
// Copy this file, point --task-path at your copy, and export your own functions. Tasks
// should be idempotent: delivery is at least once (see the README).
import { currentTask } from '../src/worker/task-context.ts';

/** The Python tool's own example: returns a + b. */
export function test(a: number, b: number): number {
  return a + b;
}

/** Sleeps for `seconds` (it may be fractional) without blocking the worker's event loop. */
export async function sleep(seconds: number): Promise<null> {
  await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  return null;
}

/** Adds any number of numbers: {"func": "add", "args": [1, 2, 3]} -> 6. */
export function add(...numbers: number[]): number {
  return numbers.reduce((sum, n) => sum + n, 0);
}

/** Keyword arguments arrive as a last, plain-object argument: {"func": "greet", "args": ["Ada"], "kwargs": {"greeting": "Hi"}}. */
export function greet(name: string, options: { greeting?: string } = {}): string {
  return `${options.greeting ?? 'Hello'}, ${name}!`;
}

/** CPU-bound work: the naive Fibonacci number, to see a worker busy. */
export function fib(n: number): number {
  return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

/** What a task can learn about its delivery: message id, redelivery, attempt, deadline. */
export function whoami(): unknown {
  const task = currentTask();
  return task && { ...task, msLeft: task.deadline - Date.now() };
}
