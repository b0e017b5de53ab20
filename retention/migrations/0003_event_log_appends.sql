-- The event log becomes a rowid table: events are appended in the order they
-- land, and only the small (source, id) index takes writes at random places.
-- Kept by (source, id) itself, as before, a batch of events touched pages all
-- over the table, and a batch wrote most of the table again.
CREATE TABLE events_appended (
    seq INTEGER PRIMARY KEY,         -- the order events landed in
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    customer TEXT NOT NULL,          -- the canonical customer (aliases resolved)
    type TEXT NOT NULL,
    at TEXT NOT NULL,                -- ISO-8601 with its time zone, as received
    ts REAL NOT NULL,                -- seconds since the epoch
    props TEXT NOT NULL,             -- the other fields, JSON
    UNIQUE (source, id)
);
INSERT INTO events_appended (source, id, customer, type, at, ts, props)
    SELECT source, id, customer, type, at, ts, props FROM events ORDER BY ts, source, id;
DROP TABLE events;
ALTER TABLE events_appended RENAME TO events;
CREATE INDEX events_customer ON events (customer, ts);
