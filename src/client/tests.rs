//! Unit tests of client resolution and authentication fields.
