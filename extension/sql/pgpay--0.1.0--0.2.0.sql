-- pgpay 0.1.0 → 0.2.0. Run by `ALTER EXTENSION pgpay UPDATE TO '0.2.0'`, never by hand.
-- Every statement is re-runnable; no table that holds data is dropped. Released scripts are never
-- edited: once 0.2.0 ships, changes go into pgpay--0.2.0--<next>.sql.
\echo Use "ALTER EXTENSION pgpay UPDATE TO '0.2.0'" to load this file. \quit

