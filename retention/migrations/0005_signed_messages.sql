-- Signed webhook messages the server stored (by signing.message_key), kept while
-- their signature could still be accepted: a copy is refused after a restart too.
-- Written in the transaction of the events the message carried.
CREATE TABLE IF NOT EXISTS signed_messages (
    key BLOB PRIMARY KEY,
    until REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS signed_messages_until ON signed_messages (until);
