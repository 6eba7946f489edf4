"""Worker processes: messages by direction, the pool that owns their state, the process loop, engines."""
