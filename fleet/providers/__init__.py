"""Providers: where instances come from. The interface (:mod:`fleet.providers.base`) and
an in-memory one for tests; the real ones live with their fleets
(:mod:`fleet.local.provider`, :mod:`fleet.aws.provider`)."""
