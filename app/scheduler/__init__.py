"""The scheduler: work items (user jobs and golden checks) and the dispatcher that queues and routes them."""
