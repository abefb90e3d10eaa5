/*
 * unicode.c - UTF-8 classification and GPT-2's byte alphabet (see unicode.h).
 *
 * Why this file exists: the tokenizer and its streaming detokenizer must
 * agree exactly on what a character is; keeping the rules in one place keeps
 * them agreeing.
 */
#include <errno.h>
#include <stdbool.h>

#include "engine/unicode.h"

int kvq_utf8_len(unsigned char lead)
{
	if (lead < 0xc0)
		return 1;
	if (lead < 0xe0)
		return 2;
	return lead < 0xf0 ? 3 : 4;
}

/* Allowed range of the second byte after @lead (Unicode Table 3-7). */
static void second_byte_range(unsigned char lead, unsigned char *lo,
			      unsigned char *hi)
{
	*lo = 0x80;
	*hi = 0xbf;
	if (lead == 0xe0)
		*lo = 0xa0;
	else if (lead == 0xed)
		*hi = 0x9f;
	else if (lead == 0xf0)
		*lo = 0x90;
	else if (lead == 0xf4)
		*hi = 0x8f;
}

int kvq_utf8_check(const unsigned char *s, size_t n)
{
	unsigned char lo, hi;
	int need, i;

	if (s[0] < 0x80)
		return 1;
	if (s[0] < 0xc2 || s[0] > 0xf4)
		return -1;
	need = s[0] < 0xe0 ? 2 : s[0] < 0xf0 ? 3 : 4;
	second_byte_range(s[0], &lo, &hi);
	for (i = 1; i < need; i++) {
		if ((size_t)i >= n)
			return 0;
		if (s[i] < lo || s[i] > hi)
			return -i;
		lo = 0x80;
		hi = 0xbf;
	}
	return need;
}

int kvq_utf8_encode(uint32_t cp, char out[4])
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xc0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xe0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[2] = (char)(0x80 | (cp & 0x3f));
		return 3;
	}
	if (cp < 0x110000) {
		out[0] = (char)(0xf0 | (cp >> 18));
		out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[3] = (char)(0x80 | (cp & 0x3f));
		return 4;
	}
	return 0;
}

int kvq_utf8_decode(const char *s, size_t n, uint32_t *cp)
{
	const unsigned char *u = (const unsigned char *)s;
	uint32_t v;
	int len, i;

	if (n == 0)
		return -EILSEQ;
	len = kvq_utf8_check(u, n);
	if (len <= 0)
		return -EILSEQ;
	if (len == 1) {
		*cp = u[0];
		return 1;
	}
	v = u[0] & (0x7f >> len);
	for (i = 1; i < len; i++)
		v = (v << 6) | (u[i] & 0x3f);
	*cp = v;
	return len;
}

/* Bytes that GPT-2's alphabet keeps as themselves. */
static bool byte_is_printable(unsigned int b)
{
	return (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) ||
	       b >= 0xae;
}

uint32_t kvq_byte_to_cp(uint8_t b)
{
	/* The others are numbered in byte order: 0x00-0x20, 0x7f-0xa0, 0xad. */
	if (byte_is_printable(b))
		return b;
	if (b <= 0x20)
		return 0x100 + b;
	if (b <= 0xa0)
		return 0x100 + 0x21 + (b - 0x7f);
	return 0x100 + 0x43;
}

int kvq_cp_to_byte(uint32_t cp)
{
	if (cp < 0x100)
		return byte_is_printable(cp) ? (int)cp : -1;
	if (cp < 0x100 + 0x21)
		return (int)(cp - 0x100);
	if (cp < 0x100 + 0x43)
		return (int)(cp - 0x100 - 0x21 + 0x7f);
	if (cp == 0x100 + 0x43)
		return 0xad;
	return -1;
}
