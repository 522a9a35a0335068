//! A minimal blocking HTTP/1.1 client (placeholder: helper A writes it).
