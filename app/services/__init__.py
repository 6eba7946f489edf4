"""Services the routers call: one function per piece of work, no HTTP types beyond the request schema."""
