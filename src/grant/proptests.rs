//! Property tests of request validation and translation.
