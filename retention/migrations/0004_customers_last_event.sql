-- at-risk reads the customers with events after the moment asked for (their
-- capital then is replayed), and the latest event the database holds: both
-- through this index instead of a scan of every customer.
CREATE INDEX IF NOT EXISTS customers_last_ts ON customers (last_ts);
