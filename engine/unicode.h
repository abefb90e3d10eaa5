/*
 * unicode.h - the little UTF-8 the tokenizers need.
 *
 * Why this file exists: tokenizers walk text one UTF-8 character at a time,
 * byte-level BPE spells every byte as a printable code point (GPT-2's
 * byte-to-unicode table), and the streaming detokenizer must tell a complete
 * character from the first bytes of one.  These helpers are plain functions
 * of their arguments: no tables to initialise, no state, no allocation.
 */
#ifndef KVQ_UNICODE_H
#define KVQ_UNICODE_H

#include <stddef.h>
#include <stdint.h>

/* The replacement character U+FFFD in UTF-8. */
#define KVQ_UTF8_REPLACEMENT "\xef\xbf\xbd"
#define KVQ_UTF8_REPLACEMENT_LEN 3

/*
 * kvq_utf8_len() - length of the character that starts with byte @lead,
 * judged from the lead byte alone as the reference tokenizers do: 1 for
 * ASCII and continuation bytes (so malformed text still advances), 2 for
 * 0xc0-0xdf, 3 for 0xe0-0xef, 4 for 0xf0-0xff.  Callers clamp it to what is
 * left of the text.
 */
int kvq_utf8_len(unsigned char lead);

/*
 * kvq_utf8_check() - classify the bytes at @s (@n of them, n >= 1).
 * Returns the length (1-4) of the complete, valid character that starts
 * there; 0 when all @n bytes are a valid start of a longer character (more
 * bytes are needed); or -k when the first k bytes (k >= 1) are a maximal
 * invalid subpart, to be replaced by one U+FFFD before looking again at
 * byte k.  Overlong forms, surrogates and values above U+10FFFF are invalid.
 */
int kvq_utf8_check(const unsigned char *s, size_t n);

/*
 * kvq_utf8_encode() - write code point @cp (at most U+10FFFF, not checked
 * for surrogates) to @out as UTF-8.  Returns the number of bytes (1-4), or
 * 0 when @cp is out of range (nothing written).
 */
int kvq_utf8_encode(uint32_t cp, char out[4]);

/*
 * kvq_utf8_decode() - decode the valid character at @s (@n bytes available)
 * into *cp.  Returns its length, or -EILSEQ when the bytes there are not a
 * complete valid character (*cp untouched).
 */
int kvq_utf8_decode(const char *s, size_t n, uint32_t *cp);

/*
 * GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves,
 * the 68 others (controls, space, DEL, NBSP, soft hyphen) for U+0100 on in
 * byte order.  kvq_byte_to_cp() never fails; kvq_cp_to_byte() returns the
 * byte, or -1 for a code point outside the alphabet.
 */
uint32_t kvq_byte_to_cp(uint8_t b);
int kvq_cp_to_byte(uint32_t cp);

#endif /* KVQ_UNICODE_H */
