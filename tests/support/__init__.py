"""Test support: fakes, fixture engines, a fake hub and sample generations."""
