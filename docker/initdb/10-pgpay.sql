-- First start of the container: the extension, and a login role for the worker.
CREATE EXTENSION pgpay;
CREATE ROLE pgpay_worker LOGIN PASSWORD 'change-me' IN ROLE pay_worker;
SELECT pay.add_webhook_secret('whsec_compose_demo_secret', 'compose-demo');
