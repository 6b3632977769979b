"""Durable jobs: a queue in the service database, workers that run stages in child processes.

db.py         the tables (jobs, artifacts, API keys), engines, `migrate(url)` (alembic)
specs.py      a job's (kind, config) validated by the stage's config, paths confined
queue.py      submit, get, list, claim (leases), heartbeat, finish, cancel, retry
backend.py    how a claimed job runs: the JobBackend interface, LocalBackend
runner.py     what runs inside a job's process: progress, cancel, log, outcome files
worker.py     WorkerConfig and run_worker: the claim / heartbeat / finish loop
artifacts.py  register_artifact and scan_data_dir: records with metrics and lineage
dbcli.py      `sparse-circuits db upgrade|current`
"""
