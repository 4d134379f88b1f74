-- Backups: an extension's tables are not in a plain pg_dump unless registered here, and a backup
-- without the payments, the outbox and the audit log would restore an empty pgpay. Every table that
-- holds data is registered with its id sequence. Webhook secrets are deliberately not: a dump file
-- is no place for them, and after a restore a DBA adds them again (README, "Backups").
SELECT pg_catalog.pg_extension_config_dump('pay.payments', '');
SELECT pg_catalog.pg_extension_config_dump('pay.orders', '');
SELECT pg_catalog.pg_extension_config_dump('pay.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('pay.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pay.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('pay.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pay.webhook_events', '');
SELECT pg_catalog.pg_extension_config_dump('pay.webhook_rejections', '');
SELECT pg_catalog.pg_extension_config_dump('pay.fulfillments', '');
SELECT pg_catalog.pg_extension_config_dump('pay.refunds', '');
SELECT pg_catalog.pg_extension_config_dump('pay.findings', '');
SELECT pg_catalog.pg_extension_config_dump('pay.findings_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pay.reconciliation_runs', '');
SELECT pg_catalog.pg_extension_config_dump('pay.reconciliation_runs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pay.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('pay.invoices', '');
SELECT pg_catalog.pg_extension_config_dump('pay.invoice_fulfillments', '');
