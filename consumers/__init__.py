"""Kafka consumer daemon for stream-l2ae: scores records and publishes alerts."""
