-- pgpay 0.1.0 → 0.2.0. Run by `ALTER EXTENSION pgpay UPDATE TO '0.2.0'`, never by hand.
-- Every statement is re-runnable; no table that holds data is dropped. Released scripts are never
-- edited: once 0.2.0 ships, changes go into pgpay--0.2.0--<next>.sql.
\echo Use "ALTER EXTENSION pgpay UPDATE TO '0.2.0'" to load this file. \quit

-- Backups (sql/98_backups.sql): register every table that holds data, so a plain pg_dump carries it.
-- pg_extension_config_dump replaces an existing entry, so this is re-runnable.
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

