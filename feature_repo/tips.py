"""Feast definitions of the tips features: entities, sources, views and the model's service.

The field lists are ml_serving.scoring.features' (the one definition of the model's inputs and
their transformations); tests/unit/test_feature_repo.py fails when the two drift apart.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Array, Float64, Int64, String, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user of the app: the user_id of Score and Generate requests.",
)
tip = Entity(
    name="tip",
    join_keys=["tip_id"],
    value_type=ValueType.STRING,
    description="A tip of the catalogue: the candidate id of Score requests.",
)

users_source = FileSource(
    name="users",
    path="data/users.parquet",
    timestamp_field="event_timestamp",
    description="Daily user snapshots (ml_serving.training.simulator.simulate_events).",
)
tips_source = FileSource(
    name="tips",
    path="data/tips.parquet",
    timestamp_field="event_timestamp",
    description="Daily tip snapshots.",
)

user_features = FeatureView(
    name="user_features",
    entities=[user],
    # Snapshots are daily: one older than two days means the pipeline stopped.
    ttl=timedelta(days=2),
    schema=[
        Field(name="tenure_days", dtype=Int64, description="Days since sign-up."),
        Field(name="sessions_7d", dtype=Int64, description="App sessions in the last 7 days."),
        Field(name="tips_seen_7d", dtype=Int64, description="Tips shown in the last 7 days."),
        Field(name="streak_days", dtype=Int64, description="Current daily-use streak."),
        Field(
            name="like_rate_30d",
            dtype=Float64,
            description="Smoothed 30-day like rate; null when no tips were seen.",
        ),
        Field(name="is_new_user", dtype=Int64, description="1 when signed up < 14 days ago."),
        *(
            Field(
                name=f"affinity_{c}",
                dtype=Float64,
                description=f"Share of past likes in {c}; null without likes.",
            )
            for c in ("health", "productivity", "finance", "learning", "relationships")
        ),
    ],
    source=users_source,
    online=True,
    description="Per-user model inputs of the tips ranker.",
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=2),
    schema=[
        Field(name="interests", dtype=Array(String), description="Favourite categories."),
        Field(name="experience_level", dtype=String, description="beginner, intermediate..."),
        Field(name="streak_days", dtype=Int64, description="Current daily-use streak."),
        Field(name="locale", dtype=String, description="BCP 47 locale of the app."),
        Field(name="recent_tips", dtype=Array(String), description="Tips shown lately."),
    ],
    source=users_source,
    online=True,
    description="The prompt context Generate fills in when a request leaves it empty.",
)

tip_features = FeatureView(
    name="tip_features",
    entities=[tip],
    ttl=timedelta(days=2),
    schema=[
        Field(name="category", dtype=String, description="One of the five tip categories."),
        Field(name="tip_length_chars", dtype=Int64, description="Length of the tip text."),
        Field(name="tip_age_days", dtype=Int64, description="Days since publication."),
        Field(
            name="tip_prior_ctr",
            dtype=Float64,
            description="Smoothed click rate; null for a tip never shown.",
        ),
        Field(name="readability", dtype=Float64, description="Flesch reading ease."),
        Field(name="has_action_step", dtype=Int64, description="1 when it ends in an action."),
    ],
    source=tips_source,
    online=True,
    description="Per-tip model inputs of the tips ranker.",
)

tips_ranker_v1 = FeatureService(
    name="tips_ranker_v1",
    features=[user_features, tip_features],
    description="Every stored input of the tips-ranker model (its card names this service).",
)
