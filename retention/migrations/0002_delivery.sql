-- Delivery of decisions by the sinks (retention deliver, retention serve).
-- status gains: sending (handed to a sink, outcome not recorded yet), sent, failed.
-- reason holds the last delivery error of a failed decision.
ALTER TABLE decisions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
-- when a failed decision is tried again (NULL: not automatically, the limit was reached)
ALTER TABLE decisions ADD COLUMN next_try REAL;
-- until when a decision being sent belongs to the process sending it
ALTER TABLE decisions ADD COLUMN lease_until REAL;
ALTER TABLE decisions ADD COLUMN sent_at TEXT;
CREATE INDEX decisions_next_try ON decisions (status, next_try);
