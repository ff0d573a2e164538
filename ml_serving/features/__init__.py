"""The online feature store on the serving path: Feast's sqlite and Redis formats read without
the Feast SDK, and the lookup policy (time budget, breaker, defaults) Score and Generate use."""
