// Signs webhook payloads with the official Stripe SDK (stripe-node's own test helper), so the
// tests' deliveries are what Stripe itself would send. Input on stdin: a JSON array of
// {payload, secret, timestamp}; output: a JSON array of Stripe-Signature header values.
const stripe = require('stripe')('sk_test_unused');

let input = '';
process.stdin.on('data', (chunk) => (input += chunk));
process.stdin.on('end', () => {
  const headers = JSON.parse(input).map(({ payload, secret, timestamp }) =>
    stripe.webhooks.generateTestHeaderString({ payload, secret, timestamp })
  );
  process.stdout.write(JSON.stringify(headers));
});
