"""The attack list: each hostile input found against the engine, store, server,
sinks and rule files, refused or bounded. Read this module to see what the
project defends against; each section is one finding, numbered as in the issue
that listed them, and each test failed on the code before its fix.
"""


# 1. Replay race: one signed event sent on many connections at once is stored once.



# 2. Email header injection through encoded words.



# 3. Times at the edge of the calendar.



# 4. A condition cannot hang the engine.



# 5. Rule files are bounded.



# 6. A lone surrogate in an event is a dead letter, not a lost batch.



# 7. NaN, Infinity and 1e400 are refused at ingest.



# 8. A CSV cell of thousands of digits is a dead letter.



# 9. YAML tags and odd names are load errors.



# 10. forget leaves no trace.



# 11. Slow clients are dropped.



# 12. deliver --backoff 0 tries each decision once per run.
