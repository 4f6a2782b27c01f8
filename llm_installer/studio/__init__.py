"""The studio: one browser page for the whole flow (models, data, plan, train, compare, export).

Every stage calls the same modules the CLI uses (store, install, fit, data.inspect, train.plan, the
`train` command itself as a subprocess, serve.engine, export); the studio only adds jobs, paths it
trusts and a page.
"""
