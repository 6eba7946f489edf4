"""Thin HTTP routers: validate, call one service, return a schema. No torch here."""
