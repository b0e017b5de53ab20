-- The embedded store: docs/store.md.

-- Append-only event log, keyed by (source, id): an id is unique per source.
CREATE TABLE events (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    customer TEXT NOT NULL,          -- the canonical customer (aliases resolved)
    type TEXT NOT NULL,
    at TEXT NOT NULL,                -- ISO-8601 with its time zone, as received
    ts REAL NOT NULL,                -- seconds since the epoch
    props TEXT NOT NULL,             -- the other fields, JSON
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE INDEX events_customer ON events (customer, ts);

-- One snapshot per customer: what the next event needs, and a few columns for reports.
CREATE TABLE customers (
    id TEXT PRIMARY KEY,
    opened_at REAL,                  -- NULL while a prospect
    level TEXT,
    capital REAL,                    -- capital at the latest event
    last_ts REAL,
    next_change_at REAL,             -- when time alone could change something; NULL: never
    state BLOB NOT NULL
);
CREATE INDEX customers_next_change ON customers (next_change_at);
CREATE INDEX customers_level ON customers (level);

CREATE TABLE ledger (
    seq INTEGER PRIMARY KEY,
    customer TEXT NOT NULL,
    ts REAL NOT NULL,
    at TEXT NOT NULL,
    rule TEXT NOT NULL,
    points REAL NOT NULL,
    event_id TEXT,
    category TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX ledger_customer ON ledger (customer, seq);

-- The decision outbox.
CREATE TABLE decisions (
    id TEXT PRIMARY KEY,
    customer TEXT,                   -- NULL once the customer is forgotten
    rule TEXT NOT NULL,
    action TEXT NOT NULL,
    params TEXT,                     -- JSON; NULL once the customer is forgotten
    at TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    via TEXT,
    trigger TEXT,
    status TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX decisions_status ON decisions (status, ts);
CREATE INDEX decisions_customer ON decisions (customer);
CREATE INDEX decisions_ts ON decisions (ts);

CREATE TABLE aliases (
    alias TEXT PRIMARY KEY,
    customer TEXT NOT NULL
);
CREATE INDEX aliases_customer ON aliases (customer);

-- Every rule-file version that was used; exactly one is active.
CREATE TABLE rule_versions (
    hash TEXT PRIMARY KEY,
    files TEXT NOT NULL,             -- JSON: [[path, text], ...]
    used_from TEXT NOT NULL,         -- wall-clock time it became active (UTC)
    active INTEGER NOT NULL DEFAULT 0
);

-- Input that could not be used, with the reason.
CREATE TABLE dead_letters (
    seq INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,            -- file name, "stdin" or "api"
    line INTEGER,
    reason TEXT NOT NULL,
    raw TEXT NOT NULL,               -- the input, with the source it was given under
    retriable INTEGER NOT NULL DEFAULT 1,   -- 0: the text alone cannot be read again
    source TEXT,                     -- the event's source and id, when it has them:
    event_id TEXT,                   -- the letter goes when that event lands
    digest TEXT NOT NULL UNIQUE,     -- of origin, line and raw: the same input is kept once
    received_at TEXT NOT NULL
);
CREATE INDEX dead_letters_event ON dead_letters (source, event_id);

-- Anonymous counters that outlive forgotten customers.
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);

-- Settings of the store: how far time was applied ('ticked_to', seconds).
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value
);
