//! Property tests of upstream-response decoding.
