//! Unit tests of grant validation and translation.
