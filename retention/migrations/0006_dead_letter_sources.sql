-- Dead letters an event source can turn into events later (its host's API could not
-- be reached: webevents.Unavailable): the source to hand the body back to on a retry
-- (retention dead-letters --retry). A letter without a row here is events, or nothing
-- a retry can use.
CREATE TABLE IF NOT EXISTS dead_letter_sources (
    seq INTEGER PRIMARY KEY REFERENCES dead_letters (seq) ON DELETE CASCADE,
    source TEXT NOT NULL
);
