-- A dead letter an event source can turn into events later (its host's API could
-- not be reached: webevents.Unavailable): the source's name, to hand the body back
-- to it on a retry (retention dead-letters --retry). NULL for every other letter.
ALTER TABLE dead_letters ADD COLUMN resend_to TEXT;
